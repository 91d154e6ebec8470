"""Built-in curation filters: which recorded teacher answers enter the training set.

A task's ``filters:`` chain runs over the whole candidate dataset, oldest example first;
each filter returns one result per example (the example, possibly changed, or None to
drop it) and the core counts what each kept, changed and dropped.

- ``valid`` (:mod:`plugins.filters.valid`): the task still accepts the target (it
  renders and parses back to an agreeing target); None targets are dropped.
- ``dedup`` (:mod:`plugins.filters.dedup`): exact duplicates of the input after
  normalisation, then near-duplicates by MiniLM cosine similarity; the newest example
  of a group is kept, because the newest teacher answer is the one to learn.
- ``pii`` (:mod:`plugins.filters.pii`): e-mail addresses, phone numbers, Luhn-valid card
  numbers, mod-97-valid IBANs, IP addresses, US SSNs and UK sort codes become typed
  placeholders (``[EMAIL]``, ``[PHONE]``, ...) in the input, the target and the recorded
  conversation, or the example is dropped. Its module-level ``redact`` and
  ``redact_value`` are reused by the core for raw records, exports and logs.
- ``length`` (:mod:`plugins.filters.length`): bounds on input and rendered-target length.

Each module registers its filter through the ``register_filters`` hook.
"""
