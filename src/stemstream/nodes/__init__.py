"""What runs on a NodeGroup after assembly: the frame-consumer interface, the counting service (batch
pool, count loop, rank-0 coordinator, live preview), MPI rank messages and counting worker processes."""
