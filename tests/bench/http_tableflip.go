// The seeds' own stack in the HTTP benchmark (tests/bench/run.py, server "go-tableflip"): a
// net/http hello server behind cloudflare/tableflip, the Go fork+exec hot-restart pattern,
// written as tableflip's own example (http_example_test.go) shows. SIGUSR2 (or SIGHUP)
// calls upg.Upgrade(), which starts a new copy of the binary with the listening socket;
// once the copy is ready (it writes the PID file), the old process leaves upg.Exit() and
// drains with server.Shutdown under a 30 s deadline, then exits.
//
// Built offline from Debian's packages (golang-go, golang-github-cloudflare-tableflip-dev):
// GO111MODULE=off GOPATH=/usr/share/gocode go build.
// Usage: http-tableflip -listen ADDR -pid-file PATH.
package main

import (
	"context"
	"flag"
	"log"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/cloudflare/tableflip"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:8080", "address")
	pidFile := flag.String("pid-file", "", "written by the process that is ready")
	flag.Parse()

	upg, err := tableflip.New(tableflip.Options{PIDFile: *pidFile})
	if err != nil {
		log.Fatal(err)
	}
	defer upg.Stop()

	go func() {
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGUSR2, syscall.SIGHUP)
		for range sig {
			if err := upg.Upgrade(); err != nil {
				log.Println("upgrade failed:", err)
			}
		}
	}()

	ln, err := upg.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	pid := strconv.Itoa(os.Getpid())
	server := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Pid", pid)
		w.Write([]byte("hello\n"))
	})}
	go server.Serve(ln)

	if err := upg.Ready(); err != nil {
		log.Fatal(err)
	}
	<-upg.Exit()

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	server.Shutdown(ctx)
}
