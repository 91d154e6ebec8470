"""distill-gateway: serve a distilled student, fall back to the teacher, keep the promise."""

import os

# Before anything imports litellm (lazily, see gateway.providers): never fetch its price
# map from the network at import; the copy it ships is used.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

__version__ = "0.1.0"
