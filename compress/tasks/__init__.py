"""One object per task: what differs between sequence classification and causal language
modelling lives here, and every stage asks the task instead of branching on its name.
`compress.tasks.registry.get_task` picks one."""
