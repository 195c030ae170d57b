from tracer import main

main()
