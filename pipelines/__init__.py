"""The EFCM Kubeflow pipeline (`pipeline.py`) and its compiler (`compile.py`)."""
