from moe2.agent.cli import main

main()
