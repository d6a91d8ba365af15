"""A scan's life in the store: every key, every typed record, the plan that routes it and the verdict that
acknowledges it. Nothing outside this package builds a store key string."""
