"""The public API's serving path: servicer, validation, tokenizer, detokenizer, the step-loop engine."""
