"""Dataset readers (stdlib only): Twitter-2015/2017 for NER and MNRE for RE."""

from model.data.examples import DataFormatError, NERExample, REExample
from model.data.mnre import MNRE_RELATIONS, NO_RELATION, read_mnre
from model.data.twitter import NER_LABELS, read_twitter_conll

__all__ = [
    "MNRE_RELATIONS",
    "NER_LABELS",
    "NO_RELATION",
    "DataFormatError",
    "NERExample",
    "REExample",
    "read_mnre",
    "read_twitter_conll",
]
