"""Data layer: text sources and task splits, the user's own files (`files`, `formats`,
`splits`), tokenizers, and the grain batch pipeline."""

from jbat.data.pipeline import (
    encode,
    eval_batches,
    num_eval_batches,
    pack_batch,
    pad_batch,
    state_from_json,
    state_to_json,
    train_loader,
)
from jbat.data.sources import (
    Document,
    Task,
    dedup,
    fortunes_dir,
    load_fortunes,
    load_jsonl,
    load_text_folder,
    make_task,
    text_hash,
)
from jbat.data.tokenizer import (
    SPECIAL_TOKENS,
    get_or_train_tokenizer,
    load_tokenizer,
    train_bpe_tokenizer,
)
from jbat.data.files import Record, RecordReader, read_all, resolve
from jbat.data.formats import FORMATS, EncodeStats, Fields, encode_records
from jbat.data.splits import TaskRecords, load_task, pool_chunks, pool_reader
from jbat.data.mixture import MixtureIterator, mixture_loader, split_rows
from jbat.data.tweets import clean_tweet, load_health_tweets, thin_domain, tweets_zip
