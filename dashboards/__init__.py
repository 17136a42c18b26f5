"""Layer 3: plotly figures, sweep reports, MLflow UI launch and static export."""
