"""PML: the prompt markup language. Text -> typed tree (nodes) -> token layout (layout)."""
