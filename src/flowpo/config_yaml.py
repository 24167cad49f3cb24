"""YAML read safely: `yaml.safe_load` that refuses alias bombs before building anything (config
files, command-line values, resumed run folders' config.yaml)."""
from __future__ import annotations

import yaml

from flowpo.errors import ConfigError, show


YAML_EXPANSION_LIMIT = 100_000
"""YAML aliases (*name) may repeat an anchored value, but the document they expand to stays under
this many characters (scalars' lengths plus one per node): a few-hundred-byte "billion laughs"
document is refused before anything is built from it."""


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader whose documents are checked for alias expansion before construction."""


def _expanded_size(node, limit: int, what: str) -> int:
    """Characters `node` expands to with every alias written out (stops counting past `limit`);
    raises ConfigError on a recursive alias."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(n) -> int:
        key = id(n)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ConfigError(f"{what}: a YAML alias refers to the value that contains it (a recursive alias); "
                              "write the value out instead")
        active.add(key)
        if isinstance(n, yaml.ScalarNode):
            total = 1 + len(n.value)
        elif isinstance(n, yaml.SequenceNode):
            total = 1
            for c in n.value:
                total = min(limit + 1, total + size(c))
        else:
            total = 1
            for k, v in n.value:
                total = min(limit + 1, total + size(k) + size(v))
        active.discard(key)
        sizes[key] = total
        return total

    return size(node)


def safe_yaml(text: str, what: str):
    """yaml.safe_load of `text` (`what` names it in messages), refusing aliases that would expand the
    document past YAML_EXPANSION_LIMIT characters. YAML syntax errors propagate as yaml.YAMLError."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        has_alias = "*" in text
        if has_alias and _expanded_size(node, YAML_EXPANSION_LIMIT, what) > YAML_EXPANSION_LIMIT:
            raise ConfigError(f"{what}: its YAML aliases (*name) expand to more than {YAML_EXPANSION_LIMIT:,} "
                              "characters; write the values out instead of repeating anchors")
        try:
            return loader.construct_document(node)
        except (ValueError, OverflowError) as e:  # e.g. an integer of more than 4300 digits
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"{what}: a value cannot be read ({show(str(e), 120)}); write a shorter one") from None
    except RecursionError:
        raise ConfigError(f"{what}: the YAML is nested too deep; flatten it") from None
    finally:
        loader.dispose()
