"""A tokenizer for data tests that need no HF tokenizer."""


class WhitespaceTokenizer:
    """Whitespace tokens with ids by first appearance, enough for ``PreferenceDataset``."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __init__(self):
        self.vocab = {}

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[self.vocab.setdefault(w, len(self.vocab) + 3) for w in t.split()] for t in texts]}
