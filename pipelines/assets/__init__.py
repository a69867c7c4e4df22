"""Software-defined assets, grouped by domain: dataset -> model -> evaluation -> report."""
