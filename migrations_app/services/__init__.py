"""Services own every state change: one function per action, one transaction per action, the audit
entry written inside it, side effects (queue, live push) on commit."""
