"""Ingestion jobs: load files, chunk them by tokens, embed, and upsert into the LanceDB store."""
