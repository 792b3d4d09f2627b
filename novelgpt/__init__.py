"""novelgpt: the library behind the scripts at the repository root (see README's Layout)."""
