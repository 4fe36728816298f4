"""Entrypoint of the shard stage: interim/ + split manifest -> processed/<H>x<W>x<C>/ TFRecord shards."""

import pneumonia.cli
import pneumonia.data.shard

if __name__ == "__main__":
    pneumonia.cli.main("shard", pneumonia.data.shard.run)
