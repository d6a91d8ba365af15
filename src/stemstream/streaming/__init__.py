"""The data plane: wire protocol, Clone store, producers, aggregator, NodeGroups. Never imports Prefect."""
