// Command drakubelet drives the kubelet's own plugin manager
// (k8s.io/kubernetes/pkg/kubelet/pluginmanager) and DRA manager
// (k8s.io/kubernetes/pkg/kubelet/cm/dra) for aiodp's end-to-end tests, against a real
// kube-apiserver.
//
// Arguments: the plugins_registry directory the plugin watcher watches, a state directory
// (the DRA manager's checkpoint), a kubeconfig and the node name. It reads one JSON command
// per line on stdin and answers one JSON object per line on stdout:
//
//	{"op":"wait_registered","driver":D,"timeout":S}    until the driver is usable
//	{"op":"prepare","pod":P,"uid":U,"claim":C}          PrepareResources; answers CDI devices
//	{"op":"unprepare","pod":P,"uid":U,"claim":C}        UnprepareResources
//	{"op":"health","pod":P,"uid":U,"claim":C,"want":H}  until the container's resource health
//	                                                    has H (e.g. "Unhealthy"); answers it
//	{"op":"restart"}                                    stop both managers, start new ones (a
//	                                                    kubelet restart: slices are wiped)
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"sort"
	"sync"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/record"
	"k8s.io/kubernetes/pkg/kubelet/pluginmanager"
	"k8s.io/kubernetes/pkg/kubelet/pluginmanager/cache"
)

var kubernetesVersion = "unknown" // set by the build: -X main.kubernetesVersion=v1.x.y

type command struct {
	Op      string  `json:"op"`
	Driver  string  `json:"driver"`
	Pod     string  `json:"pod"`
	UID     string  `json:"uid"`
	Claim   string  `json:"claim"`
	Want    string  `json:"want"`
	Timeout float64 `json:"timeout"`
}

type reply map[string]any

type kubelet struct {
	registry, state, node string
	client                kubernetes.Interface
	cancel                context.CancelFunc
	manager               manager // compat_new.go (1.34+) or compat_old.go (1.32, 1.33)
	mu                    sync.Mutex
	active                map[string]*v1.Pod // prepared and not unprepared: the kubelet's active pods
}

func (k *kubelet) activePods() []*v1.Pod {
	k.mu.Lock()
	defer k.mu.Unlock()
	var out []*v1.Pod
	for _, p := range k.active {
		out = append(out, p)
	}
	return out
}

// manager is the kubelet's DRA manager as this driver uses it, across its API changes.
type manager interface {
	handler() cache.PluginHandler
	registered(driver string) error
	PrepareResources(ctx context.Context, pod *v1.Pod) error
	UnprepareResources(ctx context.Context, pod *v1.Pod) error
	cdiDevices(pod *v1.Pod) ([]string, error)
	health(pod *v1.Pod) (map[string]string, <-chan struct{}, error)
	stop()
}

type allReady struct{}

func (allReady) AddSource(string) {}
func (allReady) AllReady() bool   { return true }

func (k *kubelet) getNode(ctx context.Context) (*v1.Node, error) {
	return k.client.CoreV1().Nodes().Get(ctx, k.node, metav1.GetOptions{})
}

func (k *kubelet) start() error {
	ctx, cancel := context.WithCancel(context.Background())
	m, err := newManager(ctx, k)
	if err != nil {
		cancel()
		return err
	}
	pm := pluginmanager.NewPluginManager(k.registry, record.NewFakeRecorder(100))
	pm.AddHandler("DRAPlugin", m.handler())
	go runPluginManager(ctx, pm)
	k.cancel, k.manager = cancel, m
	return nil
}

func (k *kubelet) stop() {
	if k.cancel != nil {
		k.cancel()
		k.manager.stop()
		k.cancel, k.manager = nil, nil
	}
}

func pod(c command) *v1.Pod {
	claim := c.Claim
	return &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: c.Pod, Namespace: "default", UID: types.UID(c.UID)},
		Spec: v1.PodSpec{
			ResourceClaims: []v1.PodResourceClaim{{Name: "gpu", ResourceClaimName: &claim}},
			Containers: []v1.Container{{
				Name:      "main",
				Resources: v1.ResourceRequirements{Claims: []v1.ResourceClaim{{Name: "gpu"}}},
			}},
		},
	}
}

func (k *kubelet) do(c command) reply {
	timeout := time.Duration(c.Timeout * float64(time.Second))
	if timeout == 0 {
		timeout = 30 * time.Second
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	switch c.Op {
	case "wait_registered":
		for {
			if err := k.manager.registered(c.Driver); err == nil {
				return reply{"ok": true, "at_ns": time.Now().UnixNano()}
			}
			select {
			case <-ctx.Done():
				return reply{"ok": false, "error": fmt.Sprint(k.manager.registered(c.Driver))}
			case <-time.After(10 * time.Millisecond):
			}
		}
	case "prepare":
		p := pod(c)
		k.mu.Lock()
		k.active[c.UID] = p
		k.mu.Unlock()
		start := time.Now()
		if err := k.manager.PrepareResources(ctx, p); err != nil {
			return reply{"ok": false, "error": err.Error()}
		}
		took := time.Since(start)
		names, err := k.manager.cdiDevices(p)
		if err != nil {
			return reply{"ok": false, "error": err.Error()}
		}
		sort.Strings(names)
		return reply{"ok": true, "cdi_devices": names, "took_ns": took.Nanoseconds()}
	case "unprepare":
		k.mu.Lock()
		delete(k.active, c.UID)
		k.mu.Unlock()
		if err := k.manager.UnprepareResources(ctx, pod(c)); err != nil {
			return reply{"ok": false, "error": err.Error()}
		}
		return reply{"ok": true}
	case "health":
		p := pod(c)
		for {
			health, updates, err := k.manager.health(p)
			if err != nil {
				return reply{"ok": false, "error": err.Error()}
			}
			for _, h := range health {
				if h == c.Want {
					return reply{"ok": true, "health": health}
				}
			}
			select {
			case <-ctx.Done():
				return reply{"ok": false, "error": "timed out", "health": health}
			case <-updates:
			case <-time.After(50 * time.Millisecond):
			}
		}
	case "restart":
		k.stop()
		if err := k.start(); err != nil {
			return reply{"ok": false, "error": err.Error()}
		}
		return reply{"ok": true, "started_ns": time.Now().UnixNano()}
	}
	return reply{"ok": false, "error": "unknown op " + c.Op}
}

func main() {
	if len(os.Args) != 5 {
		fmt.Fprintln(os.Stderr, "usage: drakubelet REGISTRY_DIR STATE_DIR KUBECONFIG NODE")
		os.Exit(2)
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", os.Args[3])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	client := kubernetes.NewForConfigOrDie(cfg)
	k := &kubelet{
		registry: os.Args[1], state: os.Args[2], node: os.Args[4], client: client,
		active: map[string]*v1.Pod{},
	}
	out := json.NewEncoder(os.Stdout)
	if err := k.start(); err != nil {
		_ = out.Encode(reply{"ok": false, "error": err.Error()})
		os.Exit(1)
	}
	_ = out.Encode(reply{"ok": true, "kubernetes": kubernetesVersion})
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		var c command
		if err := json.Unmarshal(in.Bytes(), &c); err != nil {
			_ = out.Encode(reply{"ok": false, "error": err.Error()})
			continue
		}
		_ = out.Encode(k.do(c))
	}
	k.stop()
}
