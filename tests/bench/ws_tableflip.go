// The WebSocket upgrade benchmark's Go server (tests/bench/ws_upgrade.py): a gorilla/websocket
// echo behind cloudflare/tableflip, the Go fork+exec pattern, written as tableflip's own
// example (http_example_test.go) shows: SIGHUP calls upg.Upgrade(), which starts a new copy
// of the binary with the listening socket; once the copy is ready the old process leaves
// upg.Exit(), calls server.Shutdown (which stops listening and waits for its idle HTTP
// connections) under a 30 s deadline, and returns from main.
//
// net/http's Shutdown does not track hijacked connections: "Shutdown does not attempt to
// close nor wait for hijacked connections such as WebSockets". A user who copies the example
// therefore has open WebSockets cut when the old process exits (the default, "-ws-close
// none"). "-ws-close 1001" is the careful user: a RegisterOnShutdown hook sends every open
// WebSocket a close frame 1001 (going away) at once and main waits (within the same 30 s)
// for them to end, as net/http's documentation suggests.
//
// Built offline from Debian's packages (golang-go, golang-github-gorilla-websocket-dev,
// golang-github-cloudflare-tableflip-dev): GO111MODULE=off GOPATH=/usr/share/gocode go build.
// Usage: ws-tableflip -listen ADDR -pid-file PATH [-ws-close none|1001].
package main

import (
	"context"
	"flag"
	"log"
	"net/http"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/cloudflare/tableflip"
	"github.com/gorilla/websocket"
)

var (
	upgrader = websocket.Upgrader{ReadBufferSize: 4096, WriteBufferSize: 4096}
	mu       sync.Mutex
	open     = map[*websocket.Conn]struct{}{}
	handlers sync.WaitGroup
)

func echo(w http.ResponseWriter, r *http.Request) {
	c, err := upgrader.Upgrade(w, r, nil)
	if err != nil {
		return
	}
	handlers.Add(1)
	defer handlers.Done()
	mu.Lock()
	open[c] = struct{}{}
	mu.Unlock()
	defer func() {
		mu.Lock()
		delete(open, c)
		mu.Unlock()
		c.Close()
	}()
	for {
		kind, message, err := c.ReadMessage()
		if err != nil {
			return
		}
		if err := c.WriteMessage(kind, message); err != nil {
			return
		}
	}
}

func main() {
	listenAddr := flag.String("listen", "127.0.0.1:8080", "address to listen on")
	pidFile := flag.String("pid-file", "", "path to pid file")
	wsClose := flag.String("ws-close", "none", "none: WebSockets are cut at exit; 1001: close them with 1001 and wait")
	flag.Parse()

	upg, err := tableflip.New(tableflip.Options{PIDFile: *pidFile})
	if err != nil {
		panic(err)
	}
	defer upg.Stop()

	go func() {
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGHUP)
		for range sig {
			if err := upg.Upgrade(); err != nil {
				log.Println("Upgrade failed:", err)
			}
		}
	}()

	ln, err := upg.Listen("tcp", *listenAddr)
	if err != nil {
		log.Fatalln("Can't listen:", err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/", echo)
	server := http.Server{Handler: mux}
	if *wsClose == "1001" {
		server.RegisterOnShutdown(func() {
			mu.Lock()
			defer mu.Unlock()
			msg := websocket.FormatCloseMessage(websocket.CloseGoingAway, "restart")
			for c := range open {
				c.WriteControl(websocket.CloseMessage, msg, time.Now().Add(time.Second))
			}
		})
	}
	go func() {
		if err := server.Serve(ln); err != http.ErrServerClosed {
			log.Println("HTTP server:", err)
		}
	}()
	if err := upg.Ready(); err != nil {
		panic(err)
	}
	<-upg.Exit()

	time.AfterFunc(30*time.Second, func() {
		log.Println("Graceful shutdown timed out")
		os.Exit(1)
	})
	server.Shutdown(context.Background())
	if *wsClose == "1001" {
		handlers.Wait()
	}
}
