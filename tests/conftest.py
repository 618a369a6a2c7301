"""Registers the shared fixtures. They live in model_zoo.py, a module with a unique name, because test files import
its helpers and `from conftest import ...` is ambiguous once sub-folders (tests/train/) have their own conftest."""

from model_zoo import arch, hf_checkpoint, pair, pytest_collection_modifyitems, transformers  # noqa: F401
