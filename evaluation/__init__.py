"""`ragtune bench`: compare base, RAG, fine-tuned and fine-tuned + RAG answers on a QA set
through the server's OpenAI endpoint, with judge-free metrics and confidence intervals."""
