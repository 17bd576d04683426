"""The directory SGLang's CPU worker has first on its PYTHONPATH: its `sitecustomize` prepares each of its processes."""
