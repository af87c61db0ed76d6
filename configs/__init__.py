"""Built-in compression profiles (installed as the package `vllm_kvplug.configs`)."""
