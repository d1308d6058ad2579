"""Public ops of unif2ace. Every op takes ``backend=`` and has a plain-PyTorch ``*_ref`` oracle."""
