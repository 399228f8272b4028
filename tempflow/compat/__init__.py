"""Drop-in replacements for functions of other flow-RL codebases (see each submodule)."""
