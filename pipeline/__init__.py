"""trimpi: internalize long, partly visual policies into a vision-language model."""
