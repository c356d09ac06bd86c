"""The engine: encode modules, splice their states, prefill what is new, decode."""
