"""The data plane: producers on the DAQ servers, the aggregator, the NodeGroups' receiving side, and the
producers' hold-and-replay (retention) and disk fallback."""
