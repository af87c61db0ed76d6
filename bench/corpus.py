"""Real English text for the quality benchmark, taken from Debian packages.

`bench/quality.py --setup` calls `setup_corpus`, which fetches a Debian package with
`apt-get download` (nothing is installed), unpacks it with `dpkg -x` under
`$KVPLUG_CACHE_DIR/corpus/` and writes one plain UTF-8 text file there:

- `kjv` (default): the King James Bible (public domain), one verse per line, a blank line
  between chapters; ~4.1 MB, ~1M tokens. `bible-kjv-text` holds the text in a compressed
  random-access format; the `bible` program from `bible-kjv` (also only unpacked, not
  installed) prints it.
- `python-doc`: the reStructuredText sources of the Python 3.11 documentation (PSF
  licence), technical English with markup, cut at `max_mb`.

The file is self-contained: copy it to a machine without network and pass it with
`--corpus-file`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from vllm_kvplug.models.smollm2 import default_cache_dir

CORPORA = ("kjv", "python-doc")
DEFAULT_CORPUS = "kjv"


def corpus_path(name: str = DEFAULT_CORPUS, root: Path | None = None) -> Path:
    """Where `setup_corpus(name)` writes its text file."""
    return (root or default_cache_dir()) / "corpus" / f"{name}.txt"


def setup_corpus(name: str = DEFAULT_CORPUS, root: Path | None = None,
                 max_mb: float | None = None) -> Path:
    """Download, unpack and convert corpus `name`; return the path of its text file."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; choose one of {', '.join(CORPORA)}")
    out = corpus_path(name, root)
    work = out.parent / "debs"
    work.mkdir(parents=True, exist_ok=True)
    if name == "kjv":
        text = _kjv_text(work)
    else:
        text = _python_doc_text(work, max_mb or 4.0)
    if max_mb:
        text = _cut(text, int(max_mb * 1e6))
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    return out


def read_corpus(path: str | os.PathLike) -> str:
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ValueError(f"corpus file {path} is empty")
    return text


# -- Debian packages -----------------------------------------------------------------

def apt_unpack(package: str, work: Path) -> Path:
    """`apt-get download` + `dpkg -x` one package; return the folder it was unpacked to."""
    target = work / package
    if target.is_dir() and any(target.iterdir()):
        return target
    debs = _download(package, work)
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    subprocess.run(["dpkg", "-x", str(debs), str(target)], check=True)
    return target


def _download(package: str, work: Path) -> Path:
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"`{tool}` not found: corpus setup needs a Debian/Ubuntu "
                               "machine; elsewhere pass any text file with --corpus-file")

    def attempt() -> subprocess.CompletedProcess:
        return subprocess.run(["apt-get", "download", package], cwd=work, check=False,
                              capture_output=True, text=True)

    result = attempt()
    if result.returncode != 0:
        # A fresh container often has empty package lists.
        subprocess.run(["apt-get", "update"], capture_output=True, text=True, check=False)
        result = attempt()
    found = sorted(work.glob(f"{package}_*.deb"))
    if result.returncode != 0 or not found:
        raise RuntimeError(f"apt-get download {package} failed: "
                           f"{(result.stderr or result.stdout).strip()[-500:]}")
    return found[-1]


# -- King James Bible ----------------------------------------------------------------

_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+)\s+(.*)$")


def _kjv_text(work: Path) -> str:
    data = apt_unpack("bible-kjv-text", work) / "usr" / "lib"
    program = apt_unpack("bible-kjv", work) / "usr" / "bin" / "bible"
    # -f: one verse per line with its reference; -l: no line wrapping.
    result = subprocess.run(
        [str(program), "-p", str(data), "-f", "-l", "1000000", "Gen1:1-Rev22:21"],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, check=True,
    )
    lines, chapter = [], None
    for line in result.stdout.splitlines():
        match = _VERSE.match(line.strip())
        if not match:
            continue
        book, chap, _verse, text = match.groups()
        if chapter is not None and (book, chap) != chapter:
            lines.append("")
        chapter = (book, chap)
        lines.append(text.strip())
    if len(lines) < 30000:
        raise RuntimeError(f"the bible program printed only {len(lines)} verses")
    return "\n".join(lines) + "\n"


# -- Python documentation ------------------------------------------------------------

def _python_doc_text(work: Path, max_mb: float) -> str:
    root = apt_unpack("python3.11-doc", work)
    sources = sorted(root.glob("usr/share/doc/python3.11/html/_sources/**/*.rst.txt"))
    if not sources:
        raise RuntimeError("no .rst.txt sources found in python3.11-doc")
    # Prose-heavy sections first, so a cut keeps tutorials and the language reference.
    order = ("tutorial", "reference", "howto", "faq", "library")
    sources.sort(key=lambda p: (next((i for i, k in enumerate(order) if k in p.parts),
                                     len(order)), str(p)))
    parts, size = [], 0
    for path in sources:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        parts.append(text)
        size += len(text) + 2
        if size > max_mb * 1e6:
            break
    return "\n\n".join(parts) + "\n"


def _cut(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    end = text.rfind("\n", 0, max_chars)
    return text[: end if end > 0 else max_chars] + "\n"
