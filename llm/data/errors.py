"""The one exception type of the data path."""


class DataError(ValueError):
    """Bad data input: a missing or altered file, a manifest that disagrees with its shards, a wrong tokenizer.

    The message always names the file (or input) and what differs, so a user can act on it without a traceback.
    """
