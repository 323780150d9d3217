"""Batch querying: a JSONL file of questions in, one answer line each out.

Scheduled so neighbours share the longest prompt prefix, decoded in batches on the model worker,
written line by line so a rerun finishes what a killed run left. Two modes: RAG (each question
retrieves) and long-context (given documents form one shared prefix).
"""

from ragcache.batch.job import BatchJob, BatchSettings, BatchStatus, EmptyBatchError
from ragcache.batch.longdoc import Document, LongContextMode, LongContextSettings
from ragcache.batch.modes import RagMode
from ragcache.batch.output import OutputNotWritableError
from ragcache.batch.runners import SequentialRunner, WorkerRunner

__all__ = [
    "BatchJob",
    "BatchSettings",
    "BatchStatus",
    "Document",
    "EmptyBatchError",
    "LongContextMode",
    "LongContextSettings",
    "OutputNotWritableError",
    "RagMode",
    "SequentialRunner",
    "WorkerRunner",
]
