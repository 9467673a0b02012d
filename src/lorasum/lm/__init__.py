"""Language models: loading base models, domain data, training adapters, perplexity, generation, data statistics."""
