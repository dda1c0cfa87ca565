"""vims.avm: the A-VM agent: collector, scorer workers and aggregator joined into integrity reports."""
