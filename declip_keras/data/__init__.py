"""Data: TFRecord shards, the `tf.data` training and evaluation pipelines, the
image views, EDA, the tokenizer, MLM masking, bad-record checks, the
caption-table-to-shards writer and the built-in datasets.

This package's own import is light; its modules import TensorFlow where they
need it, except `batch_format` and `image_constants`, which import nothing."""
