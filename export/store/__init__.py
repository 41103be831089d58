"""The model store's operations: list, remove, copy, pack to one archive and import (hashes verified),
and pull from the Hugging Face hub. Where the store is and what a name is: contract/model_store.py.

Inside export/ because each of them writes model folders the way an export does (export/atomic.py);
the server reads the store through contract/model_store.py and the runtime's manifest only.
"""
