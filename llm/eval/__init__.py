"""Evaluation: representative validation sampling (`validation`), lm-evaluation-harness on our models (`harness`),
perplexity of any text (`perplexity`), a cloze task built offline (`cloze`), and `llm eval` (`run`)."""
