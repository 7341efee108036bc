"""The cost model: what a step costs on given machines (estimate), from figures measured on each (probe).
`plan --estimate` prints it; the placement uses the figures to give faster nodes bigger shares."""
