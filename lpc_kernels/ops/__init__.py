"""One module per op family, each holding the op's whole contract: the public function with its docstring,
the argument checks, the ``torch.library`` custom op (namespace ``lpc``), its fake (meta) implementation,
autograd, and the backward op. Contracts in words: ``docs/design.md``, "Op contracts"."""
