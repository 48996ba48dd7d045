"""B3 batch mining (docs/reference.md, "B3 batch mining"), one stage per module: `ranking` (teacher
top-(p+m)), `graph` (mutual S-edges), `clusters` (METIS + exact K), `batches` (epochs and the batch
file), `negatives` (B3++), `report`; `miner` runs them in order. The CLI is `vlm2vec_jax.mine`."""
