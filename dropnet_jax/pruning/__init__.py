"""What to drop: node/filter masks and their operations (`masks`), the criteria registry (`criteria`), the
oracle (`oracle`), and weight granularity (`weight_masks`, `weight_criteria`). Every criterion is a pure
function of (trained θ, unit statistics, mask, key)."""
