"""Run one benchmark configuration in its own process, and explain it when it fails.

Each configuration gets a spawned child, so one engine's memory and CUDA state never
leak into the next measurement. The child sends its output (and that of the engine-core
and worker processes it starts) to a log file per configuration, enforces the time limit
itself, stops every process it started, writes its result as JSON and leaves with
`os._exit` (vLLM's CPU engine can abort during interpreter shutdown after all work is
done). A configuration that fails is reported with the first error found in its log,
instead of ending the whole run.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

GRACE_S = 120  # the parent's backstop beyond the child's own limit


def safe_name(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def run_isolated(fn: Callable[[Any, dict], dict], config, args: dict, work_dir: Path,
                 timeout_s: float) -> dict:
    """Run `fn(config, args)` in a spawned child; return its result with `ok` set.

    `config` needs a `label`. The result also carries `log_file`, and on failure `error`
    and `root_cause` (the first exception or crash message in the log).
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    name = safe_name(config.label)
    result_path = (work_dir / f"result-{name}.json").resolve()
    log_file = (work_dir / f"engine-{name}.log").resolve()
    result_path.unlink(missing_ok=True)
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_child,
                       args=(fn, config, args, str(result_path), str(log_file), timeout_s))
    proc.start()
    proc.join(timeout_s + GRACE_S)
    if proc.is_alive():
        _kill_tree(proc.pid)
        proc.join()
        result = {"ok": False, "error": f"no result within {timeout_s + GRACE_S:.0f} s"}
    elif not result_path.exists():
        result = {"ok": False, "error": f"child exited with code {proc.exitcode}, no result"}
    else:
        result = json.loads(result_path.read_text())
    result["log_file"] = str(log_file)
    if not result.get("ok"):
        result["root_cause"] = root_cause(log_file)
    return result


def stop_engine(llm) -> None:
    """Shut a `vllm.LLM`'s engine-core and worker processes down (best effort)."""
    if llm is not None:
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001 - the sweep in _child remains
            pass


def _child(fn, config, args, result_path: str, log_file: str, timeout_s: float) -> None:
    log = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    signal.signal(signal.SIGALRM, _time_is_up)
    signal.alarm(max(1, int(timeout_s)))
    try:
        result = {"ok": True, **fn(config, args)}
    except BaseException as e:  # noqa: BLE001 - report every failure to the parent
        result = {"ok": False, "error": f"{type(e).__name__}: {e}",
                  "traceback": traceback.format_exc()}
    finally:
        signal.alarm(0)
    _kill_tree(os.getpid(), include_root=False)
    Path(result_path).write_text(json.dumps(result))
    os._exit(0)


def _time_is_up(signum, frame):
    raise TimeoutError("no result within the time limit (engine hung?)")


def _kill_tree(pid: int, include_root: bool = True) -> None:
    """Kill `pid`'s descendants (engine core, workers) and optionally `pid` itself.

    Killing only the child would leave its engine processes orphaned, holding their
    KV-cache memory.
    """
    import psutil

    try:
        root = psutil.Process(pid)
        procs = root.children(recursive=True) + ([root] if include_root else [])
    except psutil.Error:
        return
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)


_LOG_PREFIX = re.compile(r"^(\(\w+ pid=\d+\)\s*)?([A-Z]+ \d\d-\d\d [\d:]+ \[[^\]]*\]\s*)?")
_NOISE = re.compile(r"\d%|it/s\]|^\[?[IWE]\d{4} ")  # progress bars, c10/glog lines
_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt): .+")


def root_cause(log_file: Path) -> str | None:
    """Where a failed run began, from its log.

    The first exception line, or, if a process died before that, vLLM's "died
    unexpectedly" line with the bare lines just above it (what the C runtime printed,
    e.g. glibc's heap-corruption message or "Segmentation fault").
    """
    try:
        lines = Path(log_file).read_text(errors="replace").splitlines()
    except OSError:
        return None
    for i, line in enumerate(lines):
        text = _LOG_PREFIX.sub("", line.strip())
        if "died unexpectedly" in text:
            return text + _crash_context(lines[max(0, i - 300):i])
        if _EXCEPTION.match(text):
            return text
    return None


def _crash_context(before: list[str]) -> str:
    """What a crashed process printed itself: bare message lines and the first native
    frame in vLLM's own C++ sources (from its segfault handler), if any."""
    messages = [b.strip() for b in before
                if b.strip() and not b[0].isspace() and _LOG_PREFIX.match(b).end() == 0
                and not _NOISE.search(b)]
    frame = next((b.strip() for b in before if b.lstrip().startswith("File ")
                  and "/csrc/" in b), None)
    parts = messages[-1:] + ([frame[:160]] if frame else [])
    return f" [{'; '.join(parts)}]" if parts else ""
