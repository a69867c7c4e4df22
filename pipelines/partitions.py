"""Partitions, built from params.yaml: categories ("<dataset>/<category>") and methods.

Static on purpose: dynamic partition keys live in the Dagster instance, and `dvc repro` runs with
a fresh instance that could not see them.
"""
from __future__ import annotations

import warnings

import dagster as dg

from pipelines.params import Params


def category_partitions(params: Params) -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition(params.categories)


def raw_partitions(params: Params) -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition(params.raw_datasets())


def raw_of_category(params: Params) -> dg.StaticPartitionMapping:
    """A category partition reads the raw partition of its dataset; generated datasets have none."""
    raw = set(params.raw_datasets())
    categories: dict[str, set[str]] = {name: set() for name in raw}
    for category in params.categories:
        dataset = category.split("/", 1)[0]
        if dataset in raw:
            categories[dataset].add(category)
    return dg.StaticPartitionMapping({name: keys for name, keys in categories.items() if keys})


def model_partitions(params: Params) -> dg.MultiPartitionsDefinition:
    # keys read "category|method": Dagster joins dimensions in alphabetical order of their names
    return dg.MultiPartitionsDefinition({"category": category_partitions(params),
                                         "method": dg.StaticPartitionsDefinition(params.methods)})


def model_partition_key(category: str, method: str) -> dg.MultiPartitionKey:
    return dg.MultiPartitionKey({"category": category, "method": method})


def split_model_key(context: dg.AssetExecutionContext) -> tuple[str, str]:
    """(category, method) of the running partition."""
    keys = context.partition_key.keys_by_dimension
    return keys["category"], keys["method"]


# model/evaluation partitions read the dataset partition of their category (a beta API, stable
# enough for a static mapping like this one)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", dg.BetaWarning)
    DATASET_OF_MODEL = dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="category")
