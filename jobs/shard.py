"""Entrypoint of the shard stage: interim/ + split manifest -> processed/<H>x<W>x<C>/ TFRecord shards."""

import pneumonia.cli

pneumonia.cli.exit_on_sigterm_while_loading()  # before TensorFlow loads: a SIGTERM meanwhile exits 143, not 137
import pneumonia.data.shard  # noqa: E402

if __name__ == "__main__":
    pneumonia.cli.main("shard", pneumonia.data.shard.run)
