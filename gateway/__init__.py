"""distill-gateway: serve a distilled student, fall back to the teacher, keep the promise."""

__version__ = "0.1.0"
