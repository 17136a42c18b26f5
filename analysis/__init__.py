"""Layer 2: run tables, fits, Pareto fronts and the SpiNNaker2 deployment model."""
