"""The stream worker: the Faust App (`app`), its agent and pages (`pipeline`), and what
replaces Faust's at-least-once bookkeeping (`committer`, `offsets`, `state_table`,
`recovery_watch`); docs/architecture.md says which Faust behaviour each one replaces."""
