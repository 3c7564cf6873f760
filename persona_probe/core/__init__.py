"""Core: what every layer shares — errors, paths and atomic writes, manifests, layer ids and the layer-spec
parser, the one JSONL reader, statistics, the seeded splitter, and the typed `Result` base."""
