-- Where a model's weights come from (hf://org/repo, r2://bucket/prefix, file:///path; see
-- services/domain/catalog/weights.py). NULL keeps what every model did before: vLLM fetches the
-- Hugging Face Hub repo of the model's name. Rows from before this migration are NULL, as a
-- rebuild from their events (which carry no source) makes them.
ALTER TABLE models ADD COLUMN weights_source text;
