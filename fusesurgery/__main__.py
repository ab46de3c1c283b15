from fusesurgery.cli import main

main()
