"""What to drop: node/filter masks and their operations (`masks`), the criteria registry (`criteria`), the
oracle (`oracle`), weight granularity (`weight_masks`, `weight_criteria`), and structured pruning at init
(`structured`: per-layer rates or a parameter budget to masks, residual groups pruned together). Every
criterion is a pure function of (trained θ, unit statistics, mask, key)."""
